"""compile-check: compile a job's programs for a TPU slice or GPU host on any machine and report what they need."""
