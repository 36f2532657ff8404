"""The HQ-CLIP recaptioner: (image, alt-text) -> four texts as schema-valid JSON."""
