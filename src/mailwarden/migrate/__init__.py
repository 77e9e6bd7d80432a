"""Carrying an existing OpenDKIM + OpenDMARC set-up over (`mailwarden import`)."""
