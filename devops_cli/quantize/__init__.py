"""`devops-model quantize`: GPTQ on optimum/gptqmodel, calibrated on the user's data."""
