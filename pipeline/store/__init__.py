"""The content-addressed layer cache and what is kept in it: compressed copies and squashed layers."""
