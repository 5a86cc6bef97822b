"""Attach the recorder where training runs: ``trajlab.integrations.hf.RecorderCallback`` for
the Hugging Face ``Trainer``, ``trajlab.integrations.lightning.RecorderCallback`` for Lightning
(docs/integrations.md). Importing these modules does not import the libraries they serve; the
callback classes are built on first use."""
