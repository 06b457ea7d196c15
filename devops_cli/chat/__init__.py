"""`devops-model chat`: the session, the decode loop, the REPL and its rendering, transcripts."""
