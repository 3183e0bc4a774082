"""The attack suite: hostile guests, local users, careless clients (issue #11)."""
