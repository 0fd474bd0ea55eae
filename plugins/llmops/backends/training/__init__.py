"""Training backends behind one interface (``job``): ``local`` (a subprocess on this machine),
``sagemaker`` (SageMaker training jobs, GPU or Trainium) and ``ec2`` (a Trainium instance over SSM)."""
