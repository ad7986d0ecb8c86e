"""soapvit: see and remove non-semantic noise in self-supervised ViT patch tokens (SOAP),
prove it on zero-shot tasks, pre-train small MIM/non-MIM models, and aggregate patch tokens."""

__version__ = "0.1.0"
