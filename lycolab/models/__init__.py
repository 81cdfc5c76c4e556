"""Base models: the embedded tiny SD, loading diffusers folders, text encoding."""
