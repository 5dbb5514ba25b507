"""EXL2 (exllamav2) format and quantizer core: options, packing, GPTQ variant, measurement.json."""
