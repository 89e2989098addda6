"""On-request benchmark studies, one module each: `--variants <NAME>` measures the study's variants."""
