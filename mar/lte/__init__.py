"""LTE host side: hinted prompts from a group's failures and refined training groups."""
