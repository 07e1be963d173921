"""One module per op: a plain-torch reference (`<op>_ref`) and its fast paths behind `<op>()`."""
