"""Documents -> training data: read (formats, one reading rule), clean, secrets (scrub), dedup, corpus."""
