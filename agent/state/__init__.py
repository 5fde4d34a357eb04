"""What an agent keeps on disk: config, VM records, job journal."""
