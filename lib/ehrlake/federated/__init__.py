"""Federated learning across hospital sites (docs/federated.md).

- :mod:`sites`: which rows each site holds (conf/federated.yaml) and what its client reads;
- :mod:`learner`: the L1 logistic regression's arithmetic a site runs on its rows;
- :mod:`privacy`: client-level differential privacy's epsilon (dp-accounting);
- :mod:`flower_apps`: Flower's ServerApp and ClientApp; :mod:`runtime`: their processes;
- :mod:`model`: the federation's weights as a Spark ML pipeline; :mod:`train`: the job.
"""
