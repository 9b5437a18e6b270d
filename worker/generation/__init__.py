"""Chapter generation: payload validation, prompts, the model layer and the pipeline."""
