from fedguard.cli import main

raise SystemExit(main())
