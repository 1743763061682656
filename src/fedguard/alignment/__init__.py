"""Safety alignment of the starting model (`fedguard align`)."""
