"""Spend intelligence: alerts and webhooks, reports, forecasts, the optimizer, volume tiers in effect."""
