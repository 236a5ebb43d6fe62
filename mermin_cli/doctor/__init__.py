"""`mermin doctor`: checks with stable ids that say why flows are missing and what to do."""
