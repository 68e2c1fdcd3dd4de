"""prefalign: preference-alignment post-training for LLMs and VLMs on top of TRL."""

__version__ = "0.1.0"
