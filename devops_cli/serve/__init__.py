"""`devops-model serve`: the OpenAI-compatible server."""
