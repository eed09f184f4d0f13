"""Flower's entry points for this bundle: ehrlake's apps, from the installed package."""

from ehrlake.federated.flower_apps import client, server

__all__ = ["client", "server"]
