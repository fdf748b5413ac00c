"""PEFT tuners of this package."""
