"""What every Unlimited Process Works service agrees on: configuration, user names and the
paths they become, and logging."""
