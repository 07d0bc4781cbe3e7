"""Int8 quantization: calibration observers, range collection, QDQ planning and emission."""
