"""Training stages: pipeline.run(cfg) (find or train the tokenizer -> tokens -> AR), the two loops (tokenizer.py,
ar.py), which tokenizer an AR run uses (resolve.py), evaluation, sampling and the end-of-run summary."""
