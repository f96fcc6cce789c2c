"""kiki-billing: outcome-based profit-share billing and delivery to billing systems."""

__version__ = "0.1.0"
