"""Raw text to curated, validated, versioned instruction datasets.

Each transform is a plain function over a list of record dicts that returns the new records and
a small dict of counts; ``llmops.data.stages`` wraps them to read and write URIs for the DAG.
"""
