"""Input side of CogReasoner: video decoding, image processing, chat template, dataset, pipelines."""
