"""Backends, one interface per concern, each with a local twin and an AWS side: ``training``,
``evaluation`` and ``endpoints`` (serving). Only these modules know where a job or an endpoint runs."""
