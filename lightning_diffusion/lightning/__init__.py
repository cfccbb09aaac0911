"""The Lightning layer: LightningModules (`models`), DataModules (`data`), callbacks, metrics glue, checkpoint and run
directory I/O, the builder that turns a composed config into data, model and trainer, and the libraries behind the
entry points (evaluation, sampling, tables, offline sweeps). It imports the math and the networks, never an entry
point; every private Lightning API it touches is in `compat`.
"""
