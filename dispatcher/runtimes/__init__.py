"""Where workers run. One module per runtime, all behind `base.Runtime`."""
