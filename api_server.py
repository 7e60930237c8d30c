"""The API document's start command, ``python api_server.py [OPTIONS]``; same as app.py."""

from app import main

if __name__ == "__main__":
    raise SystemExit(main())
