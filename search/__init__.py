"""Everything that executes: config, data, models, dropout, training, probes, the trial, the driver."""
