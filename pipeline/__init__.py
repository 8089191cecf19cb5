"""densepipe's core: config, the plugin contract and registry, data, model, training engine,
metrics, MLflow tracking and the stages (``pipeline.stages``) that the ``densepipe`` command, DVC
and Prefect all run. It imports no task plugin: tasks come through the registry."""
