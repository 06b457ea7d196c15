"""`devops-model eval`: the DevOps exam, its prompt protocols, and the prefix-KV scorer."""
