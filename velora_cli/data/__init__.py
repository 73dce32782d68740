"""Training data: loading and formats (data.load, data.formats), prompt templates, packing, plain-text corpora and
`velora data preview`."""
