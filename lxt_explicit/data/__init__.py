"""Text and prompt data written by this project (demo document, reading-comprehension prompts)."""
