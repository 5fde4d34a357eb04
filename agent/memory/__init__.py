"""Guest RAM: reading it, writing it, and finding which pages changed."""
