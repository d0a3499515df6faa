"""Webhook deliveries (issue 25): where they may go, how they are signed, retried and dead-lettered."""
