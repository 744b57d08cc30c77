"""The engine: config, step graph and fingerprints, artefacts and manifests, lock and signals, runner, trainer,
distributed helpers. It knows nothing of the model or the data: it imports none of nets, roidb or kernels."""
