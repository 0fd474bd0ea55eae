"""Evaluation backends behind one job contract (``job``): ``local`` (a subprocess on this machine)
and ``sagemaker`` (a SageMaker Processing job)."""
