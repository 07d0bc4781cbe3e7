"""Back ends: ONNX files (:mod:`graphopt.emit.onnx`) and TVM libraries
(:mod:`graphopt.emit.tvm`)."""
