"""The runtime around the one core: who calls it, where its commands run, event delivery."""
