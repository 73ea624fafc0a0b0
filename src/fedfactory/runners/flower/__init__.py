"""The one-shot federation over Flower (Message API): ClientApp, ServerApp, and a launcher that
starts a SuperLink and SuperNodes on one machine. They call the embedded runner's functions."""
