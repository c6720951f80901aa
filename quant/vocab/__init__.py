"""The vocabulary (embedding / LM head) at 8 or 4 bits, with the rows a language needs kept in FP16."""
