"""Fine-tuning on the resident base: training files, jobs, and the trainer that shares the engine thread."""
