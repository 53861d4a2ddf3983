"""Pure file formats: no subprocess, bytes in, bytes out."""
