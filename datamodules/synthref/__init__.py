"""SynthRef generator parts; the public entry point is `datamodules.synthetic`."""
