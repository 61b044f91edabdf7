"""convlstm: ConvLSTM-family models for spatiotemporal prediction."""

__version__ = "0.1.0"
