"""The eval suite: `python eval/run.py --workdir <run> --tasks perplexity,mqar,passkey,efficiency` (docs/EVAL.md)."""
